/* static/protocol.js: generated from services/wire/codes.py by `python -m services.wire.schema`; do not edit
 * (a test fails when it is stale). NO_RETRY: close codes after which a client should not reconnect
 * until something changes (credentials, parameters), or that it caused itself (1000). */
(function (root, factory) {
  if (typeof module === "object" && module.exports) module.exports = factory();
  else root.ParleyProtocol = factory();
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";
  return Object.freeze({
    "STATUS": {
      "QUEUED": "queued",
      "STREAMING": "streaming",
      "COMPLETED": "completed",
      "STOPPED": "stopped",
      "FAILED": "failed",
      "TIMEOUT": "timeout",
      "INTERRUPTED": "interrupted"
    },
    "LIVE": [
      "queued",
      "streaming"
    ],
    "TERMINAL": [
      "completed",
      "stopped",
      "failed",
      "timeout",
      "interrupted"
    ],
    "CLOSE": {
      "NORMAL": 1000,
      "GOING_AWAY": 1001,
      "MESSAGE_TOO_BIG": 1009,
      "UNAVAILABLE": 1011,
      "RESTARTING": 1012,
      "CAPACITY": 1013,
      "SLOW_CONSUMER": 4008,
      "INVALID": 4400,
      "UNAUTHORIZED": 4401,
      "FORBIDDEN": 4403,
      "NOT_FOUND": 4404
    },
    "NO_RETRY": [
      1000,
      4400,
      4401,
      4403,
      4404
    ],
    "ERROR": {
      "UNAUTHORIZED": "unauthorized",
      "FORBIDDEN": "forbidden",
      "INVALID_JSON": "invalid_json",
      "CORS_FORBIDDEN": "cors_forbidden",
      "INVALID_CURSOR": "invalid_cursor",
      "INVALID_FRAME": "invalid_frame",
      "UNKNOWN_TYPE": "unknown_type",
      "INVALID_MESSAGE": "invalid_message",
      "UNSUPPORTED_COMPONENT": "unsupported_component",
      "MESSAGE_TOO_LONG": "message_too_long",
      "INVALID_IMAGE": "invalid_image",
      "IMAGE_TOO_LARGE": "image_too_large",
      "FILE_TOO_LARGE": "file_too_large",
      "INVALID_FILE": "invalid_file",
      "UNSUPPORTED_FILE_TYPE": "unsupported_file_type",
      "QUOTA_EXCEEDED": "quota_exceeded",
      "BOT_NOT_FOUND": "bot_not_found",
      "VISITOR_REQUIRED": "visitor_required",
      "HUMAN_CHECK_REQUIRED": "human_check_required",
      "HUMAN_CHECK_FAILED": "human_check_failed",
      "HUMAN_CHECK_UNAVAILABLE": "human_check_unavailable",
      "FILE_NOT_FOUND": "file_not_found",
      "INVALID_REQUEST": "invalid_request",
      "INVALID_PARAM": "invalid_param",
      "INVALID_SESSION_TYPE": "invalid_session_type",
      "PIPELINE_NOT_FOUND": "pipeline_not_found",
      "SESSION_NOT_FOUND": "session_not_found",
      "MESSAGE_NOT_FOUND": "message_not_found",
      "INVALID_OFFSET": "invalid_offset",
      "SESSION_BUSY": "session_busy",
      "RATE_LIMITED": "rate_limited",
      "CAPACITY": "capacity",
      "DRAINING": "draining",
      "NOT_READY": "not_ready",
      "STORE_UNAVAILABLE": "store_unavailable",
      "OVERLOADED": "overloaded",
      "NOT_FOUND": "not_found",
      "CONFLICT": "conflict",
      "NOT_LATEST_REPLY": "not_latest_reply",
      "REPLY_LIVE": "reply_live",
      "TOO_MANY_MEMBERS": "too_many_members",
      "TOO_MANY_SESSIONS": "too_many_sessions",
      "CROSS_ORIGIN": "cross_origin",
      "HOST_NOT_ALLOWED": "host_not_allowed",
      "UNSUPPORTED_MEDIA_TYPE": "unsupported_media_type",
      "LENGTH_REQUIRED": "length_required",
      "PAYLOAD_TOO_LARGE": "payload_too_large",
      "METHOD_NOT_ALLOWED": "method_not_allowed",
      "INTERNAL_ERROR": "internal_error"
    }
  });
});
