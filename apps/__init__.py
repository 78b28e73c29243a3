"""Streamlit apps on ONNX-exported models (onnxruntime and numpy only; no torch)."""
