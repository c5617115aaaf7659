"""Start-up progress: bars and phase lines on a terminal (or JAXMM_PROGRESS=1), phase lines
through logging when logging shows INFO, nothing extra in a log without a terminal."""

import logging

from jaxmm import progress


def test_switch(monkeypatch, capsys):
    monkeypatch.delenv("JAXMM_PROGRESS", raising=False)
    assert not progress.enabled()  # captured stderr is no terminal
    monkeypatch.setenv("JAXMM_PROGRESS", "1")
    assert progress.enabled()
    monkeypatch.setenv("JAXMM_PROGRESS", "off")
    assert not progress.enabled()


def test_bar_only_when_enabled(monkeypatch, capsys):
    monkeypatch.setenv("JAXMM_PROGRESS", "0")
    assert list(progress.bar(range(3), desc="Compiling", unit="bucket")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("JAXMM_PROGRESS", "1")
    with progress.bar(total=2, desc="Loading weights", unit="tensor") as b:
        b.update()
        b.update()
    assert "Loading weights" in capsys.readouterr().err


def test_phase_line_goes_to_logging_or_stderr(monkeypatch, capsys, caplog):
    monkeypatch.setenv("JAXMM_PROGRESS", "1")
    # logging not set to show INFO (a plain script): the line goes to stderr itself
    with caplog.at_level(logging.WARNING, logger="jaxmm"):
        with progress.phase("loaded weights"):
            pass
    assert "jaxmm: loaded weights in 0.0 s" in capsys.readouterr().err
    # logging shows INFO (jaxmm serve, an application's config): once, through logging
    with caplog.at_level(logging.INFO, logger="jaxmm"):
        progress.note("engine ready in %.1f s", 1.25)
    assert "engine ready in 1.2 s" in caplog.text
    assert capsys.readouterr().err == ""
    # no terminal and no logging: silent
    monkeypatch.setenv("JAXMM_PROGRESS", "0")
    with caplog.at_level(logging.WARNING, logger="jaxmm"):
        progress.lazy_compile_note(7)
    assert capsys.readouterr().err == ""
