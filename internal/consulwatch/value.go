package consulwatch

import (
	"context"
	"sync"

	"github.com/hashicorp/consul/api"
)

// Value is the latest answer of one watch, shared by the parts of a process
// that need it, so that each endpoint is watched once (the sidecar and its
// embedded authorizer both need the CA roots).
type Value[T any] struct {
	Status *Status

	deliver sync.Mutex // held while subscribers are called, so they see answers in order
	mu      sync.Mutex
	v       T
	loaded  bool
	subs    []func(T)
}

// NewValue returns a Value not loaded yet.
func NewValue[T any]() *Value[T] { return &Value[T]{Status: NewStatus()} }

// Subscribe calls f with every new answer, from the watch's goroutine (it
// must not block), starting with the current one if there is one.
func (v *Value[T]) Subscribe(f func(T)) {
	v.deliver.Lock()
	defer v.deliver.Unlock()
	v.mu.Lock()
	v.subs = append(v.subs, f)
	cur, loaded := v.v, v.loaded
	v.mu.Unlock()
	if loaded {
		f(cur)
	}
}

func (v *Value[T]) set(x T) {
	v.deliver.Lock()
	defer v.deliver.Unlock()
	v.mu.Lock()
	v.v, v.loaded = x, true
	subs := v.subs
	v.mu.Unlock()
	for _, f := range subs {
		f(x)
	}
}

// Watch keeps v current with query until ctx is done; w's Status is v's.
func (v *Value[T]) Watch(ctx context.Context, c *api.Client, query Query[T], w Watch) {
	w.Status = v.Status
	Run(ctx, c, query, w, v.set)
}
