"""The engine that runs a training step above the model: pipeline runner and schedules, gradient
buffers, the distributed optimizer, tensor-parallel gradient sync, process-group launch, and
`TrainingStep` (step.py), the one optimizer step `train.py` loops over."""
