"""Structured logs: one event per line, key=value. Never a full name, phone,
address or account number: every line passes `MaskAccounts` on its way out,
whatever logger wrote it (a refusal message may quote the account a bank sent)."""
from __future__ import annotations

import logging
import sys

from yindian_common.fields import mask_accounts


class MaskAccounts(logging.Filter):
    """Masks account numbers in the formatted message (the arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_accounts(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup_logging(level: str = "INFO", process: str = "yindian") -> None:
    fmt = f"ts=%(asctime)s level=%(levelname)s proc={process} logger=%(name)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr,
                        force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(MaskAccounts())
