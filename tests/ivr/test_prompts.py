"""Prompts rendered by espeak-ng and sox: valid 8 kHz mono 16-bit WAVs that
are not silent and last as long as the phrase, cached per phrase, bounded."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import subprocess
import wave
from pathlib import Path

import pytest

from ivr import phrases
from ivr.chinese_numerals import date_words, fen_words
from ivr.prompts import PromptError, PromptRenderer, PromptSettings, wav_duration_s

pytestmark = pytest.mark.timeout(60)


def sox_rms(wav: Path) -> float:
    out = subprocess.run(["sox", str(wav), "-n", "stat"], capture_output=True, text=True, check=True).stderr
    m = re.search(r"RMS\s+amplitude:\s+([0-9.]+)", out)
    assert m, out
    return float(m.group(1))


def render(renderer: PromptRenderer, text: str) -> Path:
    return asyncio.run(renderer.render(text)).with_suffix(".wav")


@pytest.mark.parametrize("text", [
    phrases.ENTER_ACCOUNT,
    f"您目前欠费{fen_words(10_000_010)}，违约金{fen_words(5)}。缴费截止日期是{date_words(dt.date(2026, 12, 1))}。",
    phrases.GOODBYE,
])
def test_prompt_is_a_valid_audible_8khz_mono_wav(tmp_path: Path, text: str) -> None:
    wav = render(PromptRenderer(PromptSettings(cache_dir=tmp_path)), text)
    with wave.open(str(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getcomptype()) == (8000, 1, 2, "NONE")
        seconds = w.getnframes() / w.getframerate()
    # Mandarin at about 3.3 characters a second: 0.15-0.6 s per character, pauses included.
    assert 0.15 * len(text) <= seconds <= 0.6 * len(text), (seconds, len(text))
    assert abs(wav_duration_s(wav) - seconds) < 0.01
    assert sox_rms(wav) > 0.02  # not silence
    assert re.fullmatch(r"[0-9a-f]{32}\.wav", wav.name)  # names nothing about the text


def test_each_phrase_is_rendered_once_and_reused(tmp_path: Path) -> None:
    renderer = PromptRenderer(PromptSettings(cache_dir=tmp_path))

    async def many() -> set[Path]:
        return set(await asyncio.gather(*(renderer.render(phrases.MENU) for _ in range(5))))

    stems = asyncio.run(many())
    assert len(stems) == 1
    wav = next(iter(stems)).with_suffix(".wav")
    first = wav.stat().st_ino
    assert render(renderer, phrases.MENU) == wav and wav.stat().st_ino == first  # cached, not re-rendered
    assert render(renderer, phrases.GOODBYE) != wav
    assert not list((tmp_path / ".tmp").iterdir())  # no half-written files left


def test_cache_stays_under_its_byte_bound(tmp_path: Path) -> None:
    one = render(PromptRenderer(PromptSettings(cache_dir=tmp_path / "probe")), phrases.GOODBYE).stat().st_size
    renderer = PromptRenderer(PromptSettings(cache_dir=tmp_path / "c", cache_bytes_max=int(one * 2.5)))
    old = render(renderer, phrases.GOODBYE)
    os.utime(old, (1, 1))  # least recently used
    for text in (phrases.MENU, phrases.ENTER_ACCOUNT, phrases.TOO_MANY_ATTEMPTS):  # each longer than GOODBYE
        render(renderer, text)
    sizes = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.wav"))
    assert sizes <= one * 2.5
    assert not old.exists()


def test_bad_text_and_missing_tools_are_refused(tmp_path: Path) -> None:
    renderer = PromptRenderer(PromptSettings(cache_dir=tmp_path, text_chars_max=20))
    with pytest.raises(Exception, match="prompt"):
        asyncio.run(renderer.render("太长" * 20))
    with pytest.raises(Exception, match="control"):
        asyncio.run(renderer.render("a\nb"))
    broken = PromptRenderer(PromptSettings(cache_dir=tmp_path / "b", espeak_bin="no-such-espeak"))
    with pytest.raises(PromptError, match="not installed"):
        asyncio.run(broken.render(phrases.GOODBYE))
