"""Callbacks: EMA of the student, two time-scale updates, sample pictures and ground-truth metrics."""
from .consistency_curriculum import ConsistencyCurriculum
from .ema import StudentEMA
from .fid import FIDCallback
from .ground_truth import GroundTruthMetrics
from .run_guard import RunGuard
from .samples import SampleImages
from .ttur import TwoTimeScaleUpdate
from .text_metrics import TextToImageMetrics
