# Varnish VCL accepting HTTP PURGE requests from purged (Varnish >= 6, VCL 4.1).
#
# @BACKEND_HOST@ / @BACKEND_PORT@ are the backend (in a CDN: the local Traffic Server).
# purged may reach Varnish over TCP from loopback, or over a Unix socket listener named
# "purge", e.g. `-a purge=/run/varnish-privileged.socket,mode=0666`. Over a Unix socket
# client.ip always reads 0.0.0.0, so that listener is allowed by its name, not by address.
vcl 4.1;

backend default {
    .host = "@BACKEND_HOST@";
    .port = "@BACKEND_PORT@";
}

acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.method == "PURGE") {
        if (client.ip ~ purgers || local.socket == "purge") {
            # 200 whether or not the object was cached.
            return (purge);
        }
        return (synth(405, "PURGE not allowed"));
    }
}

sub vcl_deliver {
    # Tells a cache hit from a miss (used by the tests).
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}
