"""Beagle's speculative decoding loop (draft trees, batches), for transformers' `custom_generate`."""


def generate(model, *args, assistant_model=None, **kwargs):
    run = getattr(assistant_model, "beagle_generate_with_own_loop", None)
    if run is None:
        raise ValueError(
            "custom_generate from a Beagle checkpoint expected `assistant_model=<the Beagle model>`, found "
            f"{type(assistant_model).__name__}."
        )
    return run(model, *args, **kwargs)
