#!/usr/bin/env bash
# Build the synhpc Apptainer image on a Hyak compute node and install it on shared storage.
#
# Usage: containers/build.sh [DEST_DIR]        (see --help)
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: containers/build.sh [-h|--help] [DEST_DIR]

Build containers/synhpc.def into synhpc.sif on a compute node, then move it to DEST_DIR.

DEST_DIR defaults to $SYNHPC_IMAGE_DIR, else /gscratch/$LAB/containers.

Run it inside an allocation (login nodes have no apptainer build and little memory):
    hyakalloc                                   # lists your accounts and partitions
    salloc -A <account> -p ckpt-all -c 4 --mem=32G --time=2:00:00
    containers/build.sh /gscratch/<lab>/containers

Environment:
    SYNHPC_IMAGE_DIR   destination folder when DEST_DIR is not given
    LAB                lab name used in the default /gscratch/$LAB/containers
    SYNHPC_IMAGE_NAME  file name of the image (default synhpc.sif)
    SYNHPC_BUILD_TMP   node-local folder for the build (default /scr if writable, else /tmp)
    APPTAINER_CACHEDIR layer cache (default: inside the build folder, discarded afterwards)
EOF
}

die() {
    echo "build.sh: $*" >&2
    exit 1
}

dest_arg=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            usage >&2
            die "unknown option: $1"
            ;;
        *)
            [[ -z "$dest_arg" ]] || die "only one DEST_DIR may be given (got '$dest_arg' and '$1')"
            dest_arg="$1"
            ;;
    esac
    shift
done

# Login nodes are shared and lack the resources (and on Hyak the permission) for a fakeroot build.
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    cat >&2 <<'EOF'
build.sh: not inside a SLURM job: refusing to build on a login node.
Get a compute node first, for example:
    hyakalloc                  # shows the accounts and partitions you may use
    salloc -A <account> -p ckpt-all -c 4 --mem=32G --time=2:00:00
then run containers/build.sh again from that shell.
EOF
    exit 1
fi

if [[ -n "$dest_arg" ]]; then
    dest_dir="$dest_arg"
elif [[ -n "${SYNHPC_IMAGE_DIR:-}" ]]; then
    dest_dir="$SYNHPC_IMAGE_DIR"
elif [[ -n "${LAB:-}" ]]; then
    dest_dir="/gscratch/$LAB/containers"
else
    die "no destination: pass DEST_DIR, or set SYNHPC_IMAGE_DIR or LAB (for /gscratch/\$LAB/containers)"
fi
image_name="${SYNHPC_IMAGE_NAME:-synhpc.sif}"
if [[ "$image_name" != *.sif || "$image_name" == */* ]]; then
    die "SYNHPC_IMAGE_NAME must be a plain *.sif file name, got '$image_name'"
fi

command -v apptainer >/dev/null 2>&1 || die "apptainer not found on PATH (try: module load apptainer)"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
definition="containers/synhpc.def"
# The definition's %files paths are relative: they resolve against the directory the build runs in.
cd "$repo_root"
[[ -f "$definition" ]] || die "missing $repo_root/$definition"

# Catch a bad base tag or --cleanenv before a long pull; skipped where spython is not installed.
python_bin="${PYTHON:-python3}"
if command -v "$python_bin" >/dev/null 2>&1 && "$python_bin" -c "import spython" >/dev/null 2>&1; then
    "$python_bin" -m slurm.container "$definition" || die "$definition has problems (listed above); fix them first"
fi

# Build on node-local disk: squashfs creation and fakeroot unpacking are slow and fragile on GPFS.
if [[ -n "${SYNHPC_BUILD_TMP:-}" ]]; then
    tmp_base="$SYNHPC_BUILD_TMP"
elif [[ -d /scr && -w /scr ]]; then
    tmp_base="/scr"
else
    tmp_base="/tmp"
fi
mkdir -p "$tmp_base"
TMPDIR_LOCAL="$(mktemp -d "$tmp_base/synhpc-build.XXXXXX")"
partial=""
cleanup() {
    rm -rf "$TMPDIR_LOCAL"
    # A copy that failed half-way must not linger next to the real image.
    if [[ -n "$partial" ]]; then rm -f "$partial"; fi
}
trap cleanup EXIT
# Apptainer's own scratch and layer cache default to /tmp and $HOME; $HOME's quota on Hyak is too small.
export APPTAINER_TMPDIR="$TMPDIR_LOCAL/tmp"
export APPTAINER_CACHEDIR="${APPTAINER_CACHEDIR:-$TMPDIR_LOCAL/cache}"
mkdir -p "$APPTAINER_TMPDIR" "$APPTAINER_CACHEDIR"

echo "build.sh: building $definition in $TMPDIR_LOCAL (job $SLURM_JOB_ID on ${HOSTNAME:-unknown})"
apptainer build --fakeroot "$TMPDIR_LOCAL/synhpc.sif" "$definition"

mkdir -p "$dest_dir"
final="$(cd "$dest_dir" && pwd)/$image_name"
# Copy next to the target, then rename: jobs still running the old image keep its inode, and nobody ever
# sees a half-copied file under the final name.
partial="$final.partial.$$"
cp "$TMPDIR_LOCAL/synhpc.sif" "$partial"
mv -f "$partial" "$final"

echo "build.sh: image installed at $final"
apptainer inspect --labels "$final"
echo "$final"
