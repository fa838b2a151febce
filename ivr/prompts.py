"""Spoken prompts: text → 8 kHz mono 16-bit WAV (what Asterisk plays
natively), synthesised by espeak-ng (Mandarin voice `cmn`) and resampled by
sox, cached per phrase under a content-hashed name in a bounded directory.

Rendering runs in child processes awaited by asyncio, so the event loop
keeps serving other calls; at most `renders_max` run at once. A file appears
in the cache only complete (rendered to a temporary name, then renamed).
The file name says nothing about the text (it is a hash): a personalised
dunning prompt names no account. Never pass the text through a shell."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from yindian_common.fields import text as checked_text

__all__ = ["PromptError", "PromptRenderer", "PromptSettings", "wav_duration_s"]

log = logging.getLogger("yindian.ivr.prompts")

# Changing how prompts sound must change every name, so stale files are never played.
RENDER_VERSION = "1"
WAV_HEADER_BYTES = 44
WAV_BYTES_PER_S = 8000 * 2
# About 3.3 Chinese characters a second with espeak-ng's cmn voice: clear on a phone line.
DEFAULT_SPEED_WPM = 190


class PromptError(Exception):
    """A prompt could not be rendered (tool missing, failed or too slow)."""


@dataclass(frozen=True)
class PromptSettings:
    cache_dir: Path
    voice: str = "cmn"
    speed_wpm: int = DEFAULT_SPEED_WPM
    text_chars_max: int = 400
    cache_bytes_max: int = 256 * 1024 * 1024
    renders_max: int = 2
    render_timeout_s: float = 20.0
    espeak_bin: str = "espeak-ng"
    sox_bin: str = "sox"


def wav_duration_s(path: Path) -> float:
    """Duration of one of our 8 kHz 16-bit mono files, from its size."""
    return max(0.0, (path.stat().st_size - WAV_HEADER_BYTES) / WAV_BYTES_PER_S)


class PromptRenderer:
    def __init__(self, settings: PromptSettings) -> None:
        self.settings = settings
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir = settings.cache_dir / ".tmp"
        self._tmp_dir.mkdir(exist_ok=True)
        self._renders = asyncio.Semaphore(settings.renders_max)
        self._inflight: dict[str, asyncio.Task[Path]] = {}

    def stem(self, text: str) -> Path:
        """The cache path of a phrase without extension (what AGI commands name)."""
        s = self.settings
        key = "\x1f".join((RENDER_VERSION, s.voice, str(s.speed_wpm), text)).encode("utf-8")
        return s.cache_dir / hashlib.sha256(key).hexdigest()[:32]

    async def render(self, text: str) -> Path:
        """The stem of the phrase's WAV, rendering it first if it is not cached."""
        checked_text(text, "prompt", self.settings.text_chars_max)
        if not text.strip():
            raise ValueError("an empty prompt cannot be spoken")
        stem = self.stem(text)
        wav = stem.with_suffix(".wav")
        if wav.exists():
            with contextlib.suppress(FileNotFoundError):
                os.utime(wav)  # recently used: evicted last
            return stem
        task = self._inflight.get(stem.name)
        if task is None:  # one render per phrase, however many calls want it
            task = asyncio.ensure_future(self._render_file(text, wav))
            self._inflight[stem.name] = task
            task.add_done_callback(lambda _t: self._inflight.pop(stem.name, None))
        await asyncio.shield(task)
        return stem

    async def _render_file(self, text: str, wav: Path) -> Path:
        s = self.settings
        raw = self._tmp_dir / f"{wav.stem}.{os.getpid()}.raw.wav"
        tmp = self._tmp_dir / f"{wav.stem}.{os.getpid()}.wav"
        started = time.monotonic()
        async with self._renders:
            try:
                await self._run([s.espeak_bin, "-v", s.voice, "-s", str(s.speed_wpm), "-w", str(raw), text])
                await self._run([s.sox_bin, "-q", str(raw), "-r", "8000", "-c", "1", "-b", "16",
                                 "-e", "signed-integer", str(tmp)])
                os.replace(tmp, wav)
            finally:
                for p in (raw, tmp):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
        log.info("event=prompt_rendered file=%s seconds=%.2f render_ms=%d", wav.name, wav_duration_s(wav),
                 (time.monotonic() - started) * 1000)
        self._evict()
        return wav

    async def _run(self, argv: list[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError as exc:
            raise PromptError(f"{argv[0]} is not installed (apt-get install espeak-ng sox)") from exc
        try:
            _, err = await asyncio.wait_for(proc.communicate(), self.settings.render_timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise PromptError(f"{argv[0]} took longer than {self.settings.render_timeout_s}s") from None
        if proc.returncode != 0:
            raise PromptError(f"{argv[0]} failed ({proc.returncode}): {err[-300:].decode('utf-8', 'replace')}")

    def _evict(self) -> None:
        """Keeps the cache under its byte bound, least recently used first."""
        files = []
        total = 0
        for p in self.settings.cache_dir.glob("*.wav"):
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
                total += st.st_size
        if total <= self.settings.cache_bytes_max:
            return
        files.sort()
        target = self.settings.cache_bytes_max * 9 // 10
        for _mtime, size, p in files:
            if total <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                total -= size
                log.info("event=prompt_evicted file=%s", p.name)
