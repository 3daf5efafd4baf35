"""What the add-on writes when the browser is on, and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from scrapy.settings import Settings

from scrapy_speedup.browser.setup import ResourceBlocker, configure_browser
from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.exceptions import SpeedupSettingsError


def configured(**values: object) -> Settings:
    settings = Settings({"SPEEDUP_BROWSER_ROUTER_ENABLED": True, **values})
    configure_browser(settings, SpeedupConfig.from_settings(settings))
    return settings


def test_handlers_launch_options_and_middlewares() -> None:
    settings = configured()
    handler = "scrapy_speedup.browser.handler.SpeedupPlaywrightHandler"
    assert settings.getdict("DOWNLOAD_HANDLERS") == {"http": handler, "https": handler}
    options = settings.getdict("PLAYWRIGHT_LAUNCH_OPTIONS")
    # make test installs Debian's headless shell: preferred, headless already.
    assert options["executable_path"].endswith("chromium-headless-shell")
    assert not any(arg.startswith("--headless") for arg in options["args"])
    assert f"--renderer-process-limit={os.cpu_count() or 1}" in options["args"]
    blocker = settings["PLAYWRIGHT_ABORT_REQUEST"]
    assert isinstance(blocker, ResourceBlocker)
    assert blocker.resource_types == {"image", "media", "font"}
    assert settings.getfloat("PLAYWRIGHT_DEFAULT_NAVIGATION_TIMEOUT") == 30_000
    assert any("BrowserRouterDownloaderMiddleware" in str(k)
               for k in settings.getdict("DOWNLOADER_MIDDLEWARES"))


def _on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        executable = tmp_path / name
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_the_headless_shell_is_preferred_when_headless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _on_path(tmp_path, monkeypatch, "chromium", "chromium-headless-shell")
    options = configured().getdict("PLAYWRIGHT_LAUNCH_OPTIONS")
    assert options["executable_path"] == str(tmp_path / "chromium-headless-shell")
    assert not any(arg.startswith("--headless") for arg in options["args"])
    # A browser with a window is the full one.
    options = configured(PLAYWRIGHT_LAUNCH_OPTIONS={"headless": False}).getdict(
        "PLAYWRIGHT_LAUNCH_OPTIONS")
    assert options["executable_path"] == str(tmp_path / "chromium")
    assert not any(arg.startswith("--headless") for arg in options["args"])


def test_the_full_chromium_runs_in_the_new_headless_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _on_path(tmp_path, monkeypatch, "chromium")
    options = configured().getdict("PLAYWRIGHT_LAUNCH_OPTIONS")
    assert options["executable_path"] == str(tmp_path / "chromium")
    assert "--headless=new" in options["args"]


def test_the_projects_own_settings_win() -> None:
    settings = Settings({"SPEEDUP_BROWSER_ENABLED": True})
    settings.set("PLAYWRIGHT_LAUNCH_OPTIONS", {"executable_path": "/opt/my/chrome"},
                 priority="project")
    settings.set("PLAYWRIGHT_ABORT_REQUEST", "myproject.abort", priority="project")
    configure_browser(settings, SpeedupConfig.from_settings(settings))
    assert settings.getdict("PLAYWRIGHT_LAUNCH_OPTIONS") == {"executable_path": "/opt/my/chrome"}
    assert settings["PLAYWRIGHT_ABORT_REQUEST"] == "myproject.abort"
    assert not any("Router" in str(k) for k in settings.getdict("DOWNLOADER_MIDDLEWARES"))


def test_no_chromium_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SpeedupSettingsError, match=r"found no Chromium .* \(apt-get install"
                                                   r" chromium.*SPEEDUP_BROWSER_EXECUTABLE"):
        configured()


def test_a_browser_with_a_window_is_not_told_to_install_the_headless_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The headless shell is installed but has no window: the error names the
    # full browser to install, not the shell that is there already.
    _on_path(tmp_path, monkeypatch, "chromium-headless-shell")
    with pytest.raises(SpeedupSettingsError, match="found no Chromium") as raised:
        configured(PLAYWRIGHT_LAUNCH_OPTIONS={"headless": False})
    message = str(raised.value)
    assert "apt-get install chromium" in message
    assert "install chromium-headless-shell" not in message
    assert '"headless": false' in message


def test_another_reactor_is_refused() -> None:
    with pytest.raises(SpeedupSettingsError, match="need the asyncio reactor"):
        configured(TWISTED_REACTOR="twisted.internet.epollreactor.EPollReactor")
    with pytest.raises(SpeedupSettingsError, match="need the asyncio reactor"):
        configured(TWISTED_REACTOR_ENABLED=False)


def test_a_handler_of_the_projects_own_is_refused() -> None:
    with pytest.raises(SpeedupSettingsError, match=r"DOWNLOAD_HANDLERS\['http'\] is 'my.Handler'"):
        configured(DOWNLOAD_HANDLERS={"http": "my.Handler"})
    # scrapy-playwright's own is replaced by its subclass.
    handlers = configured(DOWNLOAD_HANDLERS={
        "http": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler"
    }).getdict("DOWNLOAD_HANDLERS")
    assert handlers["http"] == "scrapy_speedup.browser.handler.SpeedupPlaywrightHandler"
