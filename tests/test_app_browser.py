"""A real browser: headless Chromium opens the app, clicks Generate and sees the video playing before the
generation ends. The engine is slowed down (a sleep after every block) so that "before the end" is observable.

Needs the Debian packages chromium and chromium-driver, ffmpeg, and the selenium package; skipped otherwise.
Screenshots go to pytest's tmp_path and, if APP_SCREENSHOT_DIR is set, are copied there (CI artifacts).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
    pytest.skip("Gradio's streaming gr.Video needs ffmpeg and ffprobe (apt-get install ffmpeg)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test drives Chromium with selenium "
                                                            "(pip install selenium)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from app.testing import running_app, tiny_app_engine  # noqa: E402

FRAMES = 69  # 6 blocks: about 3 s of generation at 0.5 s per block, 4.3 s of video
BLOCK_DELAY = 0.5
STOP_BLOCK_DELAY = 1.5

STATE_JS = """
const v = document.querySelector('#video video');
const s = document.querySelector('#status');
return {time: v ? v.currentTime : null, paused: v ? v.paused : null, ready: v ? v.readyState : null,
        duration: v ? v.duration : null, status: s ? s.innerText : ''};
"""


@pytest.fixture()
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    target = os.environ.get("APP_SCREENSHOT_DIR")
    if target:
        os.makedirs(target, exist_ok=True)
        shutil.copy(path, os.path.join(target, name))


def block_of(status: str) -> int:
    """The block number of a status line "... block K of N ..."."""
    return int(status.split("block ")[1].split(" of")[0])


def test_video_plays_while_it_is_generated_and_stops(browser, tmp_path):
    engine = tiny_app_engine(block_delay=BLOCK_DELAY)
    with running_app(engine) as app:
        browser.get(app.url)
        wait = WebDriverWait(browser, 60)
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#generate-btn")))
        frames = browser.find_element(By.CSS_SELECTOR, "#frames input[type=number]")
        frames.clear()
        frames.send_keys(str(FRAMES))
        frames.send_keys("\t")  # commit the value (change event)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#frames input[type=number]")
                   .get_attribute("value") == str(FRAMES))
        browser.find_element(By.CSS_SELECTOR, "#generate-btn").click()

        playing_during_generation = None
        states = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = browser.execute_script(STATE_JS)
            states.append(state)
            playing = state["time"] is not None and state["time"] > 0 and state["paused"] is False
            if playing and "Generating" in state["status"] and playing_during_generation is None:
                playing_during_generation = state
                screenshot(browser, tmp_path, "app-playing-while-generating.png")
            if "Done" in state["status"]:
                break
            time.sleep(0.1)
        assert playing_during_generation is not None, f"never saw the video playing during generation: {states}"
        done = int(playing_during_generation["status"].split(f" / {FRAMES} frames")[0].rsplit(" ", 1)[-1])
        assert done < FRAMES  # frames were still being generated while the video played
        assert "Done" in states[-1]["status"], states[-1]

        # the whole video arrives: it plays to its end (FRAMES / 16 s), and the mp4 is offered for download
        wait.until(lambda d: d.execute_script(STATE_JS)["duration"] is not None
                   and abs(d.execute_script(STATE_JS)["duration"] - FRAMES / 16) < 0.2)
        link = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#download a")))
        assert link.get_attribute("href")
        screenshot(browser, tmp_path, "app-done.png")
        assert list(app.serving.runs_dir.iterdir()) == []

        # Stop: ends the next run within one block, and what was made is still offered for download. Blocks take
        # STOP_BLOCK_DELAY here, longer than the browser's round trip (status shown -> click -> Stop event), so the
        # block count is exact even on a loaded machine: the status shows k finished blocks when Stop is clicked,
        # block k + 1 is running, and it is the last one.
        engine.block_delay = STOP_BLOCK_DELAY
        browser.find_element(By.CSS_SELECTOR, "#generate-btn").click()
        fast = WebDriverWait(browser, 60, poll_frequency=0.05)
        fast.until(lambda d: "block 2 of" in d.execute_script(STATE_JS)["status"])
        shown = browser.execute_script(STATE_JS)["status"]
        browser.find_element(By.CSS_SELECTOR, "#stop-btn").click()
        wait.until(lambda d: "Stopped" in d.execute_script(STATE_JS)["status"])
        status = browser.execute_script(STATE_JS)["status"]
        stopped_at = block_of(status)
        assert stopped_at <= block_of(shown) + 1, (shown, status)  # the block running when Stop came is the last one
        assert stopped_at < 6, status  # FRAMES is 6 blocks: the run did not finish
        link = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#download a")))
        assert link.get_attribute("href")
        screenshot(browser, tmp_path, "app-stopped.png")


LIVE_JS_STATE = """
const c = document.querySelector('#live canvas');
const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let lit = 0; for (let i = 0; i < px.length; i += 4) lit += (px[i] + px[i + 1] + px[i + 2]) > 30;
const a = document.querySelector('#live .live-mp4');
return {status: document.querySelector('#live .live-status').innerText,
        note: document.querySelector('#live .live-note').innerText, lit: lit, stats: window.liveStats,
        mp4: a ? a.href : null, sharp: getComputedStyle(c).imageRendering};
"""


def test_live_page_paints_frames_switches_prompt_stops_and_records(browser, tmp_path):
    """The Live tab: Start paints frames on the canvas as they are decoded, Enter applies a new prompt while it
    runs, the status shows block, fps, real-time factor and prompt, Stop ends it and offers the recording."""
    import httpx
    from selenium.webdriver.common.keys import Keys

    with running_app(tiny_app_engine()) as app:
        browser.get(app.url)
        wait = WebDriverWait(browser, 60)
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "button[role=tab][id$='live-button'], "
                                                                 "button[role=tab]")))
        tab = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Live")
        tab.click()
        start = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#live .live-start")))
        prompt = browser.find_element(By.CSS_SELECTOR, "#live .live-prompt")
        prompt.clear()
        prompt.send_keys("a red circle moving left")
        start.click()
        wait.until(lambda d: d.execute_script(LIVE_JS_STATE)["stats"]["painted"] >= 20)
        state = browser.execute_script(LIVE_JS_STATE)
        assert state["lit"] > 0 and state["sharp"] == "pixelated", state  # frames drawn, upscaled pixel-sharp
        assert "Live · block" in state["status"] and "frames/s generated" in state["status"], state
        assert "x real time" in state["status"] and "prompt: a red circle moving left" in state["status"], state
        screenshot(browser, tmp_path, "app-live.png")

        prompt.clear()
        prompt.send_keys("a blue square moving up", Keys.ENTER)  # the field stays editable while it runs
        wait.until(lambda d: "prompt: a blue square moving up" in d.execute_script(LIVE_JS_STATE)["status"])
        assert "New prompt from block" in browser.execute_script(LIVE_JS_STATE)["note"]
        prompt.clear()
        prompt.send_keys("a purple dragon", Keys.ENTER)
        wait.until(lambda d: "Refused" in d.execute_script(LIVE_JS_STATE)["note"])
        assert "dragon" in browser.execute_script(LIVE_JS_STATE)["note"]

        browser.find_element(By.CSS_SELECTOR, "#live .live-stop").click()
        wait.until(lambda d: d.execute_script(LIVE_JS_STATE)["status"].startswith("Stopped"))
        state = wait.until(lambda d: d.execute_script(LIVE_JS_STATE)["mp4"] and d.execute_script(LIVE_JS_STATE))
        screenshot(browser, tmp_path, "app-live-stopped.png")
        mp4 = httpx.get(state["mp4"])
        assert mp4.status_code == 200 and mp4.content[4:8] == b"ftyp"
        timeline = httpx.get(state["mp4"][:-4] + ".json").json()["timeline"]
        assert [p for _, p in timeline] == ["a red circle moving left", "a blue square moving up"]
        painted = state["stats"]["painted"]
        time.sleep(1.0)
        assert browser.execute_script(LIVE_JS_STATE)["stats"]["painted"] == painted  # Stop stops the picture at once

        browser.refresh()  # a reloaded page offers its last recording again
        wait.until(lambda d: any(b.text == "Live" for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]")))
        next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Live").click()
        wait.until(lambda d: "Last recording" in d.find_element(By.CSS_SELECTOR, "#live .live-downloads").text)
        assert browser.execute_script(LIVE_JS_STATE)["mp4"] == state["mp4"]
