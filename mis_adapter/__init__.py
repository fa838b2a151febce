"""mis_adapter: the utility's front end. Serves BillingService and
ReportService over gRPC, owns the MIS schema, routes accounts to branch
databases and streams newly issued bills from the outbox."""
