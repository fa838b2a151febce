"""The customer web portal (网上查询电费及用电情况): a household looks up its
arrears, late fee, prepaid credit, recent bills and consumption with its
account number and the last four digits of its registered phone. It asks
mis_adapter's CustomerService over gRPC under the utility's operator
identity and never touches the MIS database."""
