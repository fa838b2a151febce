"""The IVR's settings objects (flags, YINDIAN_* environment, TOML file,
defaults, highest first): one for `ivr serve`, one for `ivr dunning`.
Every bound either uses is named here."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ivr.prompts import DEFAULT_SPEED_WPM, PromptSettings
from yindian_common.clock import DEFAULT_TZ
from yindian_common.server import TlsFiles
from yindian_common.settings import YinDianSettings


class _Upstream(YinDianSettings):
    upstream: str = Field("127.0.0.1:50051", description="mis_adapter's address (HOST:PORT)")
    operator: str = Field("ivr", description="utility operator identity sent as x-yindian-operator in "
                                             "plain-text mode (with mTLS the certificate identifies it)")
    insecure: bool = Field(False, description="plain text on loopback, no TLS (development only)")
    force_insecure: bool = Field(False, description="allow plain text to a non-loopback address")
    tls_cert: str = Field("", description="PEM client certificate presented to mis_adapter")
    tls_key: str = Field("", description="PEM private key of --tls-cert")
    tls_ca: str = Field("", description="PEM CA bundle that signs mis_adapter's certificate")
    upstream_timeout_s: float = Field(3.0, description="deadline of each call to mis_adapter")
    clock_start: str = Field("", description="ISO instant the process clock starts at (tests, demos); "
                                             "empty: system time")
    timezone: str = Field(DEFAULT_TZ, description="the utility's time zone (business dates, quiet hours)")
    log_level: str = Field("INFO", description="log level")

    # --- prompts ---
    prompt_dir: str = Field("var/ivr/prompts", description="cache of rendered prompts (Asterisk must read it)")
    voice: str = Field("cmn", description="espeak-ng voice")
    speed_wpm: int = Field(DEFAULT_SPEED_WPM, description="espeak-ng speaking rate (espeak's words per minute)")
    prompt_cache_bytes_max: int = Field(256 * 1024 * 1024, description="bound of the prompt cache")
    prompt_renders_max: int = Field(2, description="prompts rendered at once")
    prompt_render_timeout_s: float = Field(20.0, description="longest a prompt may take to render")
    prompt_chars_max: int = Field(400, description="longest prompt text")

    def tls(self) -> TlsFiles | None:
        if not (self.tls_cert or self.tls_key or self.tls_ca):
            return None
        if not (self.tls_cert and self.tls_key and self.tls_ca):
            raise SystemExit("--tls-cert, --tls-key and --tls-ca go together")
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)

    def prompts(self) -> PromptSettings:
        return PromptSettings(cache_dir=Path(self.prompt_dir), voice=self.voice, speed_wpm=self.speed_wpm,
                              text_chars_max=self.prompt_chars_max, cache_bytes_max=self.prompt_cache_bytes_max,
                              renders_max=self.prompt_renders_max,
                              render_timeout_s=self.prompt_render_timeout_s)


class IvrSettings(_Upstream):
    listen: str = Field("127.0.0.1:4573", description="FastAGI address Asterisk connects to (HOST:PORT; "
                                                      "port 0 picks one)")
    force_listen: bool = Field(False, description="allow the FastAGI port on a non-loopback address "
                                                  "(AGI is plain text: put it on the Asterisk host's network only)")
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus /metrics endpoint")
    metrics_port: int = Field(9104, description="port of the Prometheus /metrics endpoint (0 picks one)")
    sessions_max: int = Field(32, description="calls served at once; more are refused (connection closed)")
    call_duration_max_s: float = Field(300.0, description="longest call; then it is ended")
    account_attempts_max: int = Field(3, description="tries to key in a valid, known account number")
    digit_timeout_ms: int = Field(6000, description="GET DATA: time allowed between digits")
    menu_timeout_ms: int = Field(6000, description="WAIT FOR DIGIT at the menu")
    menu_rounds_max: int = Field(5, description="menu choices per call")
    line_bytes_max: int = Field(2048, description="longest AGI line accepted from Asterisk")
    header_lines_max: int = Field(128, description="most agi_* header lines accepted")
    header_timeout_s: float = Field(5.0, description="time for Asterisk's header block")
    reply_margin_s: float = Field(5.0, description="extra time for an AGI reply beyond the command's own")
    grace_s: float = Field(10.0, description="on SIGTERM, how long calls in progress may finish")


class DunningSettings(_Upstream):
    operator: str = Field("dunning", description="utility operator identity (must be a dunning operator "
                                                 "in mis_adapter)")
    spool_dir: str = Field("var/ivr/spool", description="Asterisk spool directory: call files go to its "
                                                        "outgoing/ (callfile backend)")
    backend: str = Field("callfile", description="dialer: callfile (Asterisk) or recording (tests, demos)")
    campaign_id: str = Field("", description="campaign id (1-32 of A-Za-z0-9-); empty: DUN-<YYYYMM> of today")
    min_arrears_fen: int = Field(1, description="call households owing at least this much principal (fen)")
    min_days_overdue: int = Field(1, description="call households whose oldest unpaid bill is this many days late")
    opt_out_file: str = Field("", description="file of account numbers never to call (one a line, # comments), "
                                              "in addition to the MIS opt-out flag")
    quiet_start: str = Field("21:00", description="no calls from this local time ...")
    quiet_end: str = Field("08:00", description="... until this local time")
    attempts_window_days: int = Field(7, description="window in which attempts per household are capped")
    attempts_max: int = Field(7, description="most call attempts per household within the window")
    retry_no_answer_s: int = Field(2 * 3600, description="wait after NO_ANSWER before calling again")
    retry_busy_s: int = Field(1800, description="wait after BUSY before calling again")
    retry_failed_s: int = Field(4 * 3600, description="wait after FAILED before calling again")
    retry_placed_s: int = Field(3600, description="wait after a PLACED call whose outcome never came back")
    calls_per_run_max: int = Field(500, description="most calls placed in one run")
    candidate_pages_max: int = Field(1000, description="most pages of candidates read in one run")
    candidates_page_size: int = Field(500, description="candidates per page")
    pending_households_max: int = Field(100_000, description="households remembered as called but not reached "
                                                             "(to record SKIPPED_PAID when they pay)")
    opt_out_entries_max: int = Field(100_000, description="most lines read from the opt-out file")
    # --- call files (Asterisk) ---
    channel_template: str = Field("Local/{phone}@yindian-dunning-out", description="Channel: of the call file; "
                                  "{phone} is the household's number (e.g. PJSIP/{phone}@carrier)")
    caller_id: str = Field('"95598" <95598>', description="CallerID: of the call file")
    context: str = Field("yindian-dunning", description="dialplan context the answered call enters")
    wait_time_s: int = Field(45, description="WaitTime: seconds to let the phone ring")
    max_retries: int = Field(0, description="MaxRetries: Asterisk's own redials (0: this process schedules "
                                            "retries, so every attempt is counted in the MIS)")
    retry_time_s: int = Field(300, description="RetryTime: seconds between Asterisk's own redials")
    recording_file: str = Field("", description="recording backend: where placed calls are written "
                                                "(JSON lines); empty: <spool-dir>/recorded-calls.jsonl")
    recording_outcomes: str = Field("", description="recording backend: JSON file {account_no: [outcome, ...]} "
                                                    "scripting each household's answers (default ANSWERED)")
    report_json: str = Field("", description="also write the campaign report to this JSON file")
