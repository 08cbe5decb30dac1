"""Small shared utilities: devices, checkpoints, data roots, result files, the user-input error types."""
from .errors import CheckpointError, DataFormatError, RunFolderError, UserInputError
from .device import resolve_device
from .checkpoint import atomic_save, atomic_write_text, clean_stale_tmp, load_checkpoint, rng_state, set_rng_state
from .paths import find_data_root, DataNotFoundError

__all__ = ["resolve_device", "atomic_save", "atomic_write_text", "clean_stale_tmp", "load_checkpoint", "rng_state",
           "set_rng_state", "find_data_root", "DataNotFoundError", "UserInputError", "DataFormatError",
           "CheckpointError", "RunFolderError"]
