"""Announcements from an admin (the callers check the caller is one): to every connection of a pipeline, or
to every connection of one user, on every instance."""
from services.wire import events


class Announcements:
    def __init__(self, hub, bus):
        self.hub = hub
        self.bus = bus

    def broadcast(self, message, pipeline=None):
        """To every connection of a pipeline (None: of all). Returns how many connections here it reaches."""
        delivered = sum(not c.closed for c in self.hub.of_pipeline(pipeline))
        self.bus.publish(events.Broadcast(message=message, pipeline=pipeline))
        return delivered

    def push(self, user_id, message, data=None):
        """To every connection (tab, device) of one user. Returns how many connections here it reaches."""
        delivered = sum(not c.closed for c in self.hub.of_user(user_id))
        self.bus.publish(events.Push(user_id=user_id, message=message, data=data))
        return delivered
