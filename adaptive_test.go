package llmratelimit

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func newAttemptWriter(hold bool) (*attemptWriter, *httptest.ResponseRecorder) {
	rec := httptest.NewRecorder()
	g := &headerGuard{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: rec}}
	return &attemptWriter{dst: g, hold: hold, header: make(http.Header)}, rec
}

// A refusal that may be retried reaches the client only when it is
// released, with a Retry-After if the upstream gave none.
func TestAttemptWriterHoldsRefusals(t *testing.T) {
	aw, rec := newAttemptWriter(true)
	aw.Header().Set("X-Upstream", "yes")
	aw.WriteHeader(http.StatusTooManyRequests)
	aw.Write([]byte(`{"error":"slow down"}`))
	if rec.Code != 200 || rec.Body.Len() != 0 || rec.Header().Get("X-Upstream") != "" {
		t.Fatalf("held refusal leaked: %d %q %v", rec.Code, rec.Body, rec.Header())
	}
	if !aw.holding() {
		t.Fatal("not holding")
	}
	aw.release(1500 * time.Millisecond)
	if rec.Code != 429 || rec.Body.String() != `{"error":"slow down"}` || rec.Header().Get("X-Upstream") != "yes" ||
		rec.Header().Get("Retry-After") != "2" || rec.Header().Get("Retry-After-Ms") != "1500" {
		t.Fatalf("released: %d %q %v", rec.Code, rec.Body, rec.Header())
	}
}

// A success, or any answer on the last attempt, goes through at once, and
// trailers set after the body reach the client.
func TestAttemptWriterPassesAnswers(t *testing.T) {
	for _, c := range []struct {
		hold   bool
		status int
	}{{true, 200}, {true, 400}, {false, 429}, {false, 503}} {
		aw, rec := newAttemptWriter(c.hold)
		aw.WriteHeader(c.status)
		aw.Write([]byte("body"))
		aw.Header().Set("X-Trailer", "t")
		if rec.Code != c.status || rec.Body.String() != "body" || rec.Header().Get("X-Trailer") != "t" {
			t.Errorf("hold %v status %d: got %d %q %v", c.hold, c.status, rec.Code, rec.Body, rec.Header())
		}
	}
}

// A held refusal larger than the module holds is passed on in order.
func TestAttemptWriterLargeRefusalPassesThrough(t *testing.T) {
	aw, rec := newAttemptWriter(true)
	aw.WriteHeader(http.StatusServiceUnavailable)
	aw.Write(make([]byte, maxHeldBody-10))
	aw.Write(make([]byte, 100))
	if rec.Code != 503 || rec.Body.Len() != maxHeldBody+90 {
		t.Fatalf("got %d with %d bytes", rec.Code, rec.Body.Len())
	}
}

// Early hints' headers are sent with the 103 and do not stay on the final
// response.
func TestAttemptWriterEarlyHints(t *testing.T) {
	aw, rec := newAttemptWriter(false)
	aw.Header().Set("Link", "</a.css>; rel=preload")
	aw.WriteHeader(http.StatusEarlyHints)
	delete(aw.Header(), "Link") // as reverse_proxy does after a 1xx
	aw.WriteHeader(200)
	if got := rec.Header().Get("Link"); got != "" {
		t.Fatalf("final response carries the 103's Link: %q", got)
	}
}

// After an attempt time-out, reverse_proxy's 499 is the upstream's
// silence: a 504.
func TestAttemptWriterTimeoutIs504(t *testing.T) {
	aw, rec := newAttemptWriter(false)
	aw.phase.Store(phaseTimedOut)
	aw.WriteHeader(499)
	if rec.Code != http.StatusGatewayTimeout {
		t.Fatalf("got %d", rec.Code)
	}
}
