"""Reading and writing config.json: the part of `StableLmConfig` that touches files and the hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import write_text_atomic

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class ConfigFilesMixin:
    """Part of `StableLmConfig`: it calls `to_dict()` and `from_dict()`."""

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write the config as JSON to `json_file_path`, atomically. Every field is written (`use_diff` is
        accepted for the reference's callers: this config has no separate defaults file to diff against)."""
        write_text_atomic(Path(json_file_path), self.to_json_string())

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` into `save_directory` (created if needed), atomically."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "config.json", self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Self:
        """Read a config.json file.

        Raises:
            ValueError: The file is not UTF-8 JSON holding an object, or a value is invalid; the message
                starts with the file's path and names the field.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); the file is damaged or not a "
                "config.json."
            ) from err
        except (ValueError, RecursionError) as err:  # bad syntax, an integer too long, nesting too deep
            raise ValueError(
                f"{path} is not valid JSON ({err}); the file is damaged or not a config.json."
            ) from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of config keys.")
        try:
            return cls.from_dict(data)
        except RecursionError as err:
            raise ValueError(f"{path}: a value is nested too deeply to be a config field.") from err
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> Self:
        """Read `config.json` from a local folder or a hub repo id.

        Keyword arguments `revision`, `cache_dir`, `local_files_only` and `token` go to the hub resolver;
        any other keyword overrides a config field.
        """
        from .hub import resolve_model_dir

        hub_args = {
            k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs
        }
        subfolder = kwargs.pop("subfolder", "") or ""
        pattern = f"{subfolder}/config.json" if subfolder else "config.json"
        folder = resolve_model_dir(name_or_path, allow_patterns=[pattern], **hub_args) / subfolder
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"No config.json in {folder}; a StableLM checkpoint folder needs one.")
        try:
            config = cls.from_json_file(path)
        except ValueError as err:  # name the file in every message (a wrong model_type, say)
            if str(path) in str(err):
                raise
            raise ValueError(f"{path}: {err}") from err
        config = cls.from_dict(config.to_dict(), **kwargs) if kwargs else config
        config.name_or_path = str(name_or_path)
        return config
