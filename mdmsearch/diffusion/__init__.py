"""Forward processes: linear MDMs, their exact transition kernels and validity checks."""

from .ops import apply_matrix, batch_view, expm, phi_and_noise_cov, sum_except_batch
from .params import CholeskyPSD, DiagPSD, FixedPSD, FixedSkew, SkewParam, psd_sqrt
from .presets import PROCESSES, available_processes, fixed_process, learned, preset, register_process
from .process import Kernel, LinearMDM
from .schedules import SCHEDULES, ConstantSchedule, LinearSchedule, make_schedule, register_schedule
from .structure import D_PATTERNS, Q_PATTERNS, StructureCheck, check_matrices, check_structure, d_pattern, q_pattern

__all__ = [
    "LinearMDM", "Kernel", "preset", "learned", "fixed_process", "register_process", "PROCESSES",
    "available_processes", "make_schedule", "register_schedule", "SCHEDULES", "LinearSchedule",
    "ConstantSchedule", "SkewParam", "CholeskyPSD", "DiagPSD", "FixedSkew", "FixedPSD", "psd_sqrt",
    "check_structure", "check_matrices", "StructureCheck", "Q_PATTERNS", "D_PATTERNS", "q_pattern",
    "d_pattern", "apply_matrix", "batch_view", "expm", "phi_and_noise_cov", "sum_except_batch",
]
