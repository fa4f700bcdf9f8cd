"""Console output reaches train.log; errors the console shows are written there too."""

import logging

from attention_simulator.logs import TqdmHandler, to_log_files


def test_errors_and_tracebacks_reach_the_log_file_only(tmp_path, capsys):
    root = logging.getLogger()
    file, console = logging.FileHandler(tmp_path / "train.log"), TqdmHandler()
    root.addHandler(file)
    root.addHandler(console)
    try:
        try:
            raise RuntimeError("a bug deep in training")
        except RuntimeError as e:
            to_log_files("training failed", exc_info=e)
        logging.getLogger("attention_simulator.test").warning("a warning for both")
    finally:
        root.removeHandler(file)
        root.removeHandler(console)
        file.close()
    log = (tmp_path / "train.log").read_text()
    assert "training failed" in log and "Traceback" in log and "a bug deep in training" in log
    assert "a warning for both" in log
    out = capsys.readouterr()
    assert "a warning for both" in out.err + out.out and "training failed" not in out.err + out.out
