"""Bundled job files, installed as package data so `recap demo` runs from any directory."""
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO_JOB = HERE / "demo.yaml"
