package chain

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The compiled discovery chain as Consul 1.16's /v1/discovery-chain/<name>
// writes it. consul/api's types leave out fields a proxy must honour (a
// split's request headers, a resolver's request timeout), so the answer is
// decoded here, into types that name every field Consul sends: a field
// these types do not know is an error naming it, never silently dropped.

type response struct {
	Chain *compiled
}

type compiled struct {
	ServiceName       string
	Namespace         string
	Partition         string
	Datacenter        string
	CustomizationHash string
	Default           bool
	Protocol          string
	ServiceMeta       map[string]string
	EnvoyExtensions   []json.RawMessage
	StartNode         string
	Nodes             map[string]*node
	Targets           map[string]*target
	AutoVirtualIPs    []string
	ManualVirtualIPs  []string
}

type node struct {
	Type         string
	Name         string
	Routes       []*route
	Splits       []*split
	Resolver     *resolver
	LoadBalancer *loadBalancer
}

type route struct {
	Definition *serviceRoute
	NextNode   string
}

type serviceRoute struct {
	Match       *routeMatch
	Destination *routeDestination
}

type routeMatch struct {
	HTTP *httpMatch
}

type httpMatch struct {
	PathExact  string
	PathPrefix string
	PathRegex  string
	Header     []headerMatch
	QueryParam []queryMatch
	Methods    []string
}

type headerMatch struct {
	Name    string
	Present bool
	Exact   string
	Prefix  string
	Suffix  string
	Regex   string
	Invert  bool
}

type queryMatch struct {
	Name    string
	Present bool
	Exact   string
	Regex   string
}

type routeDestination struct {
	Service               string
	ServiceSubset         string
	Namespace             string
	Partition             string
	PrefixRewrite         string
	RequestTimeout        duration
	IdleTimeout           duration
	NumRetries            uint32
	RetryOnConnectFailure bool
	RetryOnStatusCodes    []uint32
	RetryOn               []string
	RequestHeaders        *headerModifiers
	ResponseHeaders       *headerModifiers
}

type headerModifiers struct {
	Add    map[string]string
	Set    map[string]string
	Remove []string
}

type split struct {
	Definition *serviceSplit
	Weight     float64
	NextNode   string
}

type serviceSplit struct {
	Weight          float64
	Service         string
	ServiceSubset   string
	Namespace       string
	Partition       string
	RequestHeaders  *headerModifiers
	ResponseHeaders *headerModifiers
}

type resolver struct {
	Default        bool
	ConnectTimeout duration
	RequestTimeout duration
	Target         string
	Failover       *failover
}

type failover struct {
	Targets []string
	Policy  *struct {
		Mode    string
		Regions []string
	}
}

type loadBalancer struct {
	Policy         string
	RingHashConfig *struct {
		MinimumRingSize uint64
		MaximumRingSize uint64
	}
	LeastRequestConfig *struct {
		ChoiceCount uint32
	}
	HashPolicies []hashPolicy
}

type hashPolicy struct {
	Field        string
	FieldValue   string
	CookieConfig *struct {
		Session bool
		TTL     duration
		Path    string
	}
	SourceIP bool
	Terminal bool
}

type target struct {
	ID            string
	Service       string
	ServiceSubset string
	Namespace     string
	Partition     string
	Datacenter    string
	Peer          string
	MeshGateway   struct {
		Mode string
	}
	Subset struct {
		Filter      string
		OnlyPassing bool
	}
	TransparentProxy struct {
		DialedDirectly bool
	}
	ConnectTimeout duration
	External       bool
	SNI            string
	Name           string
	Locality       *struct {
		Region string
		Zone   string
	}
}

// duration reads both of Consul's spellings: a Go duration string ("3s")
// or a number of nanoseconds.
type duration time.Duration

func (d *duration) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		if s == "" {
			*d = 0
			return nil
		}
		v, err := time.ParseDuration(s)
		if err != nil {
			return err
		}
		*d = duration(v)
		return nil
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		return fmt.Errorf("duration %s: %w", b, err)
	}
	*d = duration(n)
	return nil
}

// decode reads Consul's answer. A field unknown to the types above is an
// error naming it: a newer Consul may have added a setting the chain
// relies on.
func decode(b []byte) (*compiled, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var r response
	if err := dec.Decode(&r); err != nil {
		if msg, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return nil, fmt.Errorf("the compiled chain has a field haconnect does not know: %s", msg)
		}
		return nil, fmt.Errorf("reading the compiled chain: %w", err)
	}
	if r.Chain == nil {
		return nil, fmt.Errorf("reading the compiled chain: no Chain in the answer")
	}
	return r.Chain, nil
}
