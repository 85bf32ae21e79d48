"""Training: the codec (vae), flow-matching teacher, causal ODE initialisation, Self-Forcing DMD / SiD / FGM distillation.

    python -m engine train STAGE --config configs/tiny-dmd.yaml --output-dir runs/x [--key value ...]

config.py (typed configs, presets), data.py (batches), ode.py (teacher ODE), rollout.py (Self-Forcing rollout),
losses.py (the losses), stages.py (what each stage computes), trainer.py (the accelerate loop), cli.py, vae.py
(the vae stage), vq.py (quantized stages), fast_decoder.py.
See docs/training.md.
"""
