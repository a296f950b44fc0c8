"""synhpc: classify MICrONS synapses as excitatory or inhibitory from 3D EM cubes, on a laptop or a SLURM cluster."""

__version__ = "0.1.0"
