"""Table sources: where synapse and cell-type rows come from (CAVE, or files written by other stages)."""
