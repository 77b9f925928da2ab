"""Authorization: the policy model (Istio ztunnel's) and, later, its evaluation."""
