package fakellm

import (
	"encoding/json"
	"errors"
	"net/http"
	"time"
)

// errStreamAborted ends a stream whose client went away or whose server is
// closing.
var errStreamAborted = errors.New("fakellm: stream aborted")

// streamer writes a streaming response one flushed piece at a time, so a
// client sees each event as soon as it is produced, as from a real model.
type streamer struct {
	c  *call
	rc *http.ResponseController
}

// startStream sends the status line and headers with the given content
// type, and flushes them so the client sees the response begin at once.
func (c *call) startStream(contentType string) *streamer {
	h := c.w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	c.w.WriteHeader(http.StatusOK)
	st := &streamer{c: c, rc: http.NewResponseController(c.w)}
	_ = st.rc.Flush()
	return st
}

// raw writes s and flushes it.
func (st *streamer) raw(s string) error {
	if _, err := st.c.w.Write([]byte(s)); err != nil {
		return err
	}
	return st.rc.Flush()
}

// sse writes one server-sent event, named unless name is empty.
func (st *streamer) sse(name string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	s := "data: " + string(b) + "\n\n"
	if name != "" {
		s = "event: " + name + "\n" + s
	}
	return st.raw(s)
}

// line writes v as one NDJSON line.
func (st *streamer) line(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return st.raw(string(b) + "\n")
}

// pause waits ChunkDelay before content chunk i; there is no pause before
// the first chunk, so a stream always shows content right away. It gives
// up when the client leaves or the server closes, so long delays never
// outlive a test.
func (st *streamer) pause(i int) error {
	d := st.c.s.cfg.ChunkDelay
	if i == 0 || d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-st.c.r.Context().Done():
		return errStreamAborted
	case <-st.c.s.done:
		return errStreamAborted
	}
}

// chunked sends c.chunks() content chunks with emit, pausing between them.
// It stops at the first failure, as a client that went away cannot be
// written to anyway.
func (st *streamer) chunked(emit func(i int) error) error {
	for i := range st.c.chunks() {
		if err := st.pause(i); err != nil {
			return err
		}
		if err := emit(i); err != nil {
			return err
		}
	}
	return nil
}
