"""Triton kernels, one module per op family, installed as fastflow.triton_kernels (never as bare
`triton_kernels`: that is OpenAI's package). Import only where CUDA is present, or under TRITON_INTERPRET=1
(set before importing triton).
"""
