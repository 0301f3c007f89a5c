"""The run directory: a local path or a URI (s3://, gs://, file://) through pyarrow's filesystem layer.

    RUN/config.yaml                      the resolved config of the newest session (--resume reads it)
    RUN/config_history/001-from-epoch-0003.yaml   each session's config: the first start, then every resume
    RUN/metrics.parquet                  one row per epoch
    RUN/samples/epoch-0003.parquet       one row per sample: prompt, reward, per-step credits, policy version
    RUN/images/epoch-0003.png            a grid of the epoch's first samples
    RUN/reward_curve.png                 reward vs samples seen, redrawn every epoch
    RUN/checkpoints/<session>/epoch-0003/  LoRA (diffusers format), optimizer, driver state; <session>
                                         (from-epoch-0000-<time>) is one start or resume of the run
    RUN/latest.json                      the newest *complete* checkpoint; written last

What a checkpoint holds and in which order it is written is dense_rl/run/checkpoints.py's business; this
module only moves files.

Every file is written under a temporary name and renamed into place (on object stores, where rename
is a copy, a half-written object is never visible either), and `latest.json` only ever names a
checkpoint whose files are all written, so a run killed at any moment resumes from a whole one.
"""

from __future__ import annotations

import io
import json
import os
import struct
import uuid
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
CONFIG_HISTORY = "config_history"
LATEST = "latest.json"


class RunDir:
    def __init__(self, uri: str):
        if "://" not in uri:
            uri = os.path.abspath(uri)
        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri)

    def path(self, relative: str) -> str:
        return str(PurePosixPath(self.root) / relative)

    def child(self, relative: str) -> "RunDir":
        return RunDir(f"{self.uri.rstrip('/')}/{relative}")

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def list_files(self, relative: str) -> list[str]:
        """Names of the whole files directly in folder `relative` (none if it is missing), sorted;
        a write in progress (its temporary name) is not one."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        names = [info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted(name for name in names if ".tmp-" not in name)

    # ------------------------------------------------------------------ bytes

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        self.fs.create_dir(str(PurePosixPath(target).parent), recursive=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(temporary) as stream:
            stream.write(data)
        self.fs.move(temporary, target)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def list_folders(self, relative: str) -> list[str]:
        """Names of the folders directly in folder `relative` (none if it is missing), sorted."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.Directory)

    def delete_folder(self, relative: str) -> None:
        self.fs.delete_dir(self.path(relative))

    def check_writable(self) -> None:
        """Fail early, naming the run directory, if nothing can be written there."""
        try:
            self.write_bytes(".write-check", b"ok")
            self.fs.delete_file(self.path(".write-check"))
        except OSError as error:
            raise PermissionError(f"run.output_dir: cannot write to {self.uri} ({error}); choose a writable directory") from None

    # ------------------------------------------------------------------ typed files

    def write_json(self, relative: str, value) -> None:
        self.write_bytes(relative, json.dumps(value, indent=1, sort_keys=True).encode())

    def read_json(self, relative: str):
        return json.loads(self.read_bytes(relative))

    def write_tensors(self, relative: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        self.write_bytes(relative, save_safetensors(tensors, metadata=metadata))

    def read_tensors(self, relative: str) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read_bytes(relative))

    def read_tensors_and_metadata(self, relative: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        data = self.read_bytes(relative)
        (header_size,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, then JSON
        return load_safetensors(data), json.loads(data[8 : 8 + header_size]).get("__metadata__", {})

    def write_table(self, relative: str, rows: list[dict]) -> None:
        """Rows as a parquet table whose columns are every key of any row (null where a row lacks it):
        from_pylist alone takes the columns of the first row only."""
        columns = list(dict.fromkeys(key for row in rows for key in row))
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), buffer)
        self.write_bytes(relative, buffer.getvalue())

    def read_table(self, relative: str) -> list[dict]:
        return pq.read_table(io.BytesIO(self.read_bytes(relative))).to_pylist()

    # ------------------------------------------------------------------ checkpoints (plain file ops)
    # dense_rl.run.checkpoints is their only caller: it decides when a checkpoint is complete.

    def latest_checkpoint(self) -> dict | None:
        """{"epoch": k, "path": "checkpoints/<session>/epoch-000k"} for the newest complete checkpoint, or None."""
        return self.read_json(LATEST) if self.exists(LATEST) else None

    def mark_latest(self, epoch: int, path: str) -> None:
        self.write_json(LATEST, {"epoch": epoch, "path": path})

