"""Registration: staged, batched, multi-start optimisation of poses on SE(3).

- :class:`Stage`, :class:`Schedule`: what runs (similarity, what it renders, its resolution,
  optimiser, step sizes, plateau rule), built from config; :func:`load_schedule` reads the
  presets of ``configs/registration/``.
- :mod:`~prostlab.registration.levels`: the coarser detectors and volumes of coarse-to-fine
  stages, built once per resolution.
- :func:`register`: register X-rays to volumes with the similarities of
  :mod:`prostlab.similarity`; :func:`optimise`: the same engine on any objectives.
- :class:`RegistrationRecord`, :class:`RegistrationResult`: per-case histories and outcomes.

See ``docs/registration.md``.
"""

from prostlab.registration.engine import (
    STATUSES,
    ObjectiveFactory,
    RegistrationRecord,
    RegistrationResult,
    as_schedule,
    optimise,
    register,
    stack_final_poses,
)
from prostlab.registration.schedule import (
    OPTIMIZERS,
    SIMILARITIES,
    Schedule,
    Stage,
    load_schedule,
    preset_dir,
    preset_names,
)

__all__ = [
    "OPTIMIZERS",
    "SIMILARITIES",
    "STATUSES",
    "ObjectiveFactory",
    "RegistrationRecord",
    "RegistrationResult",
    "Schedule",
    "Stage",
    "as_schedule",
    "load_schedule",
    "optimise",
    "preset_dir",
    "preset_names",
    "register",
    "stack_final_poses",
]
