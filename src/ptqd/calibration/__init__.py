"""Calibration data (time-step aware) and calibration methods (naive, qdiff)."""

from ptqd.calibration.data import CalibrationSet, collect_calibration, load_calibration, save_calibration
from ptqd.calibration.methods import METHODS, CalibrationOptions, calibrate

__all__ = [
    "METHODS",
    "CalibrationOptions",
    "CalibrationSet",
    "calibrate",
    "collect_calibration",
    "load_calibration",
    "save_calibration",
]
