"""Ray actors hosting a model, a slice of its layers or a drafter on one placed device.

This is the only package that imports Ray. The engine reaches models through `outrider.scheduler.target.TargetModel`
and `outrider.scheduler.drafters.Drafter`, so an actor-backed implementation of those plugs in without touching the
loop (see the "Distributed runtime" issue).
"""
