import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "serve": ("mis_adapter.serve", "serve BillingService and ReportService"),
    "migrate": ("mis_adapter.migrate_cmd", "upgrade every branch database to the current schema"),
    "seed": ("mis_adapter.seed", "generate a realistic utility and the banks' agreement rosters"),
    "bank": ("mis_adapter.bank_admin", "operator: list, suspend (停工) or resume (开工) a bank"),
    "issue-bills": ("mis_adapter.issue_bills", "price a period's readings, issue bills, feed auto-debit banks"),
    "reconcile": ("mis_adapter.recon_file", "reconcile a bank's day from its daily file"),
    "registry": ("mis_adapter.claim_recovery", "operator: recover open registry claims, or backfill it after a split"),
    "audit": ("mis_adapter.audit_cmd", "verify (or seal) the tamper-evident chain over the MIS journal"),
    "report": ("mis_adapter.report_cmd", "collection and arrears statistics"),
    "arrears-snapshot": ("mis_adapter.arrears_snapshot", "take the arrears snapshot of a closed day (reports read it)"),
    "bench-recon": ("mis_adapter.bench_recon", "benchmark: reconciliation and reports at scale"),
    "bench-pay": ("mis_adapter.bench_pay", "benchmark: CPU per Pay inside mis_adapter, portable vs fast SQL"),
    "bench-data": ("mis_adapter.bench_data", "benchmark/test data: populate a period, timed issue, paced probes"),
}


def main() -> int:
    """`python -m mis_adapter` and the `yindian-mis-adapter` console script."""
    return dispatch("mis_adapter", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
