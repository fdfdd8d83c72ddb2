"""Beagle's speculative decoding loop (draft trees, batches), for transformers' `custom_generate`."""


def generate(model, *args, assistant_model=None, **kwargs):
    loop = getattr(assistant_model, "beagle_decoding_loop", None)
    if loop is None:
        raise ValueError(
            "custom_generate from a Beagle checkpoint expected `assistant_model=<the Beagle model>`, found "
            f"{type(assistant_model).__name__}."
        )
    # transformers hands a custom_generate callable only the arguments it does not know itself: pass the streamer on.
    streamer = kwargs.pop("streamer", None)
    return model.generate(*args, custom_generate=loop, beagle=assistant_model, streamer=streamer,
                          beagle_streamer=streamer, **kwargs)
