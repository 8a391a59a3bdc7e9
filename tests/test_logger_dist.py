import csv

import torch

from guided_diffusion import dist_util, logger


def test_logger_writes_csv_log_and_means(tmp_path):
    logger.configure(str(tmp_path), format_strs=["log", "csv"], rank=0)
    logger.logkv("step", 0)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 3.0)
    row = logger.dumpkvs()
    assert row["loss"] == 2.0
    logger.logkv("step", 1)
    logger.logkv("extra", 5)  # a new key rewrites the header and pads earlier rows
    logger.dumpkvs()
    logger.log("hello", 42)
    logger.close()
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [r["step"] for r in rows] == ["0", "1"]
    assert rows[0]["loss"] == "2.0" and rows[0]["extra"] == ""
    assert rows[1]["extra"] == "5"
    assert "hello 42" in (tmp_path / "log.txt").read_text()


def test_logger_resumes_existing_csv(tmp_path):
    logger.configure(str(tmp_path), format_strs=["csv"], rank=0)
    logger.logkv("a", 1)
    logger.dumpkvs()
    logger.configure(str(tmp_path), format_strs=["csv"], rank=0)
    logger.logkv("a", 2)
    logger.dumpkvs()
    logger.close()
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [r["a"] for r in rows] == ["1", "2"]


def test_nonzero_rank_writes_only_its_own_text_log(tmp_path):
    logger.configure(str(tmp_path), rank=1)
    logger.logkv("a", 1)
    logger.dumpkvs()
    logger.log("from rank one")
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log-rank001.txt"]


def test_single_process_without_launcher(tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    dist_util.setup_dist()
    assert not dist_util.is_distributed()
    assert dist_util.get_rank() == 0 and dist_util.get_world_size() == 1
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(3)}, path)
    assert torch.equal(dist_util.load_state_dict(str(path))["w"], torch.arange(3))
    dist_util.sync_params([torch.zeros(2)])  # no-op without distribution
    assert dist_util.all_gather_objects(7) == [7]
