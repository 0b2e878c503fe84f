# bench --candidates gcfreeze: gc.freeze() once the server listens, so the objects of start-up (modules, the
# app, services) are never scanned again by the cyclic collector (measurement only).
import gc

import tornado.web

_listen = tornado.web.Application.listen


def listen(self, *args, **kwargs):
    server = _listen(self, *args, **kwargs)
    gc.collect()
    gc.freeze()
    return server


tornado.web.Application.listen = listen
