"""Calibration data and calibration-input capture (installed as quantkit.calib)."""
from quantkit.calib.capture import calibration_calls, record_calls, sample_pipeline
from quantkit.calib.data_files import heldout_text, read_prompts, read_text

__all__ = ["calibration_calls", "record_calls", "sample_pipeline", "read_prompts", "read_text", "heldout_text"]
