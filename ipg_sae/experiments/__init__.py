"""The experiments layer: the jobs built from many stages on top of the library.

* :mod:`.stages` — the stage runner (declared keys, markers, the SAE stage);
* :mod:`.common` — what experiments share: the sampling and held-out stages, attribution, the checks' wording;
* :mod:`.pipeline` — sample -> SAE -> attribute -> evaluate -> explore;
* :mod:`.study` — the faithfulness study;
* :mod:`.origins` — the origin comparison (``ipg-sae paths``);
* :mod:`.steering_bench` — the steering benchmark.

An experiment imports the library and :mod:`.stages` / :mod:`.common`, never another experiment; the library never
imports this layer (``tests/test_architecture.py`` checks both).
"""
