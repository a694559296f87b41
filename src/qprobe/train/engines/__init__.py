"""The step engines: native.py runs a linear probe's epochs in C (linfit.c); torch_step.py runs
the same fused step in torch, and autograd for MLP probes and objectives without a closed-form
gradient. qprobe.train.loop picks one per run."""
