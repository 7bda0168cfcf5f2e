"""spotforge drill: an emulated AWS region (moto made strict, virtual clock, latency model) and,
later, the simulated node, so the controller's recovery can be rehearsed offline. See README.md."""
