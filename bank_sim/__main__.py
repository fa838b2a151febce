import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "demo-day": ("bank_sim.demo", "run a demonstration business day on SQLite (make run)"),
    "teller": ("bank_sim.teller", "run teller sessions through a bridge"),
    "autodebit": ("bank_sim.autodebit", "consume the bill feed and debit savings accounts"),
    "reconcile": ("bank_sim.reconcile", "end-of-day reconciliation of the bank's ledger"),
    "refunds": ("bank_sim.link_ops", "credit the utility's refunds to passbooks, then acknowledge them"),
    "load": ("bank_sim.load", "open-loop load generator with a correctness check"),
    "bench-core": ("bank_sim.bench_core", "benchmark: counter payments, bridge vs direct, SQLite and PostgreSQL"),
    "bench-ratio": ("bank_sim.bench_ratio", "benchmark: pays vs a bare 2-hop gRPC echo, CPU per call per process"),
    "echo-link": ("bank_sim.echo_link", "one hop of bench-ratio's reference echo (echo or proxy server)"),
    "bench-feed": ("bank_sim.bench_feed", "benchmark: the bill feed end to end"),
    "chaos": ("bank_sim.chaos", "seeded chaos soak: real processes, faults, every money invariant checked"),
    "bench-branch": ("bank_sim.bench_branch", "benchmark: front + 4 branch databases and 2 replicas vs one "
                                              "database (PostgreSQL)"),
    "bench": ("bank_sim.bench", "benchmark: standard load profile, comparable summary"),
}


def main() -> int:
    """`python -m bank_sim` and the `yindian-bank-sim` console script."""
    return dispatch("bank_sim", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
