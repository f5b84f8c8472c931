"""bitwise-nn pipeline: one Hydra entry point per stage; the stage graph is pipeline/stages.py."""
