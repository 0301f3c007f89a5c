"""The run directory: any pyarrow filesystem URI, whole files only (optimizer state: test_checkpoint.py)."""

import torch

from dense_rl.run.storage import RunDir


def test_uri_and_plain_path_reach_the_same_files(tmp_path):
    by_uri = RunDir(f"file://{tmp_path}/run")
    by_uri.write_json("a/b.json", {"x": 1})
    by_path = RunDir(str(tmp_path / "run"))
    assert by_path.read_json("a/b.json") == {"x": 1}
    assert by_uri.child("a").exists("b.json")


def test_writes_leave_no_temporary_files(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_table("metrics.parquet", [{"epoch": 0, "reward": 1.5}, {"epoch": 1, "reward": 2.0}])
    run.write_tensors("w.safetensors", {"w": torch.arange(4.0)}, metadata={"k": "v"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet", "w.safetensors"]
    assert run.read_table("metrics.parquet")[1] == {"epoch": 1, "reward": 2.0}
    tensors, metadata = run.read_tensors_and_metadata("w.safetensors")
    assert torch.equal(tensors["w"], torch.arange(4.0)) and metadata == {"k": "v"}


def test_listing_skips_writes_in_progress(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.list_files("history") == []
    run.write_bytes("history/b.yaml", b"b")
    run.write_bytes("history/a.yaml", b"a")
    (tmp_path / "history" / "c.yaml.tmp-1234abcd").write_bytes(b"half")
    (tmp_path / "history" / "folder").mkdir()
    assert run.list_files("history") == ["a.yaml", "b.yaml"]


def test_latest_checkpoint_pointer(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.latest_checkpoint() is None
    run.mark_latest(3, "checkpoints/fit/epoch-0003")
    assert run.latest_checkpoint() == {"epoch": 3, "path": "checkpoints/fit/epoch-0003"}


def test_unwritable_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    try:
        RunDir(str(blocker / "run")).check_writable()
    except PermissionError as error:
        assert "run.output_dir" in str(error) and str(blocker) in str(error)
    else:
        raise AssertionError("writing under a file should fail")


def test_a_table_holds_the_keys_of_every_row(tmp_path):
    """A key that only later rows have (a guard's stopped_by, a held-out evaluation's timing) is kept."""
    run = RunDir(str(tmp_path / "run"))
    run.write_table("metrics.parquet", [{"epoch": 0, "reward": 1.0}, {"epoch": 1, "reward": 2.0, "stopped_by": "guard"}])
    assert run.read_table("metrics.parquet") == [{"epoch": 0, "reward": 1.0, "stopped_by": None},
                                                 {"epoch": 1, "reward": 2.0, "stopped_by": "guard"}]
