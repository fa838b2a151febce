"""Customer telephone channels: FastAGI self-service (电话查询) and voice dunning (自动语音催费)."""
