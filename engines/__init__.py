"""Face models: detection, landmarks, alignment, embedding; ONNX Runtime and TensorRT backends."""
