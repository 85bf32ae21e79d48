"""The Gradio web app of the streaming engine: `python -m app [--checkpoint DIR] [--host ...] [--port ...]`.

    serving.py   input limits and checks, one run per device, stop flags, temporary files, errors -> gr.Error
    generate.py  the Generate handler: blocks grouped into >= 1 s H.264 chunks, streamed while generated
    attack.py    the Noise-attack tab: Engine.attack in a worker thread, live loss curve, videos, statistics
    examples.py  example prompts from the model's vocabulary; the Model tab's card and configuration
    ui.py        build_app(serving) -> gr.Blocks (three tabs, API names "generate" and "attack")
    __main__.py  the command line
    testing.py   helpers for the app's tests (slowed-down tiny engine, in-process server, stream reading)

The app imports `engine`; `engine` never imports `app`. See docs/app.md.
"""
