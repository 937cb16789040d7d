"""KV parking: a llama-server's slots saved to disk before its runtime stops, restored after it starts again.

An agent client re-sends the whole conversation on every request, so a swap back to a model would pay the prefill
of all of it again. llama-server can save a slot's KV cache to a file and load it back (``--slot-save-path`` and
``POST /slots/{id}?action=save|restore``); the next request then finds the conversation's prefix in the slot and
computes only what is new.

The files live under ``$ATHANOR_HOME/park/<model>/<key>/``. The key (``key.py``) hashes everything a restore
depends on (the weights' identity, the binary's, the settings that shape the K/V cache), so a file is only ever
offered to the runtime it came from. llama-server itself checks little: a truncated file aborts it on an assertion
and a garbage one leaves the slot's K/V in doubt, so athanor writes a manifest beside each file (its size and
hash, the key, the token count) and never hands the runtime a file that does not match (``files.py``). The slot
API client is ``slots.py``; when to park and restore is the controller's (``controller/parking.py``). mlx-vlm's
own disk prefix cache is parked in the same directories, flushed and vouched for by ``apc.py``.
"""
