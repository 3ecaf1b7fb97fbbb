"""Models the stages share: image–text encoders (``encoders``) over open_clip, our trainer's
checkpoints and custom model configs. Imports the trainer's model building, never a stage."""
