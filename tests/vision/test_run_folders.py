"""Run-folder rules (vision.engine.run): a folder that holds a run is never written over; one that stopped before
its first training step (start-up files, an empty TensorBoard event file) is reused."""

from vision.engine.run import never_trained, prepare_run_dir


def _startup(run):
    run.mkdir()
    (run / "config.yaml").write_text("lr: 0.1\n")
    (run / "config.json").write_text("{}")
    (run / "tb").mkdir()
    (run / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"\x00" * 88)  # the writer's header only


def test_startup_files_and_tb_are_reused_and_tb_cleared(tmp_path):
    run = tmp_path / "exp"
    _startup(run)
    assert never_trained(run)
    assert prepare_run_dir(run) == run
    assert not (run / "tb").exists() and (run / "config.yaml").is_file()


def test_a_training_log_or_checkpoint_makes_it_a_run(tmp_path):
    for extra in ("log.csv", "checkpoints/last/model.safetensors"):
        run = tmp_path / extra.split("/")[0] / "exp"
        run.parent.mkdir()
        _startup(run)
        (run / extra).parent.mkdir(parents=True, exist_ok=True)
        (run / extra).write_text("x")
        assert not never_trained(run)
        assert prepare_run_dir(run) == run.with_name("exp2")
        assert (run / "tb").is_dir()  # the earlier run's files are untouched
