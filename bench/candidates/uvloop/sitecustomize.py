# bench --candidates uvloop: run the unchanged server on uvloop's event loop (measurement only).
import uvloop

uvloop.install()
