"""`histocsc serve`: the ONNX model over HTTP (Open Inference Protocol) plus slide jobs."""
