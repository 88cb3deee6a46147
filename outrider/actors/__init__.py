"""Ray actors hosting a model, a slice of its layers or a drafter on one placed device.

Below the top-level commands, this is the only package that imports Ray. The engine reaches models through
`outrider.scheduler.target.TargetModel` and `outrider.scheduler.drafters.Drafter`, so an actor-backed implementation
of those plugs in without touching the loop. The actors host what they are handed (a model source, a drafter
factory) and know no decoding method.
"""
