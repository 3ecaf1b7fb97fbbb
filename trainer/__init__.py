"""The bundled trainer: reinforced-shard loader, losses, evaluation, checkpoints, launchers.

It reads only the reinforced format (pipeline.reinforced) and never imports a stage."""
